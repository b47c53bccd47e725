"""Decoding benchmark: tokens/s of the base model, the heads, several dials and GenARM-style decoders, side by side.

(A script, not a module of the package: its presets, its measurement and its report stay in one
file so that one command reproduces a BENCHMARKS.md table.)

    .venv/bin/python benchmarks/decode_bench.py                        # CPU preset: the tiny world's shape
    .venv/bin/python benchmarks/decode_bench.py --preset gpu           # 7B-shaped random Llama, bf16
    .venv/bin/python benchmarks/decode_bench.py --preset gpu --dry-run # its set-up at tiny sizes, any device

Greedy decoding with the KV cache (the project's own, `models.kv_cache`, for every variant, as the
sweeps decode), prompts of 128 random tokens, 128 new tokens (no EOS stops a
row early), at batch 1 and batch 16, for:

- base: the plain LM's `generate()`;
- iav: an IAV head installed with `AlignedLM` at α = 1 (unmerged: `W_b h + α W_a h`, two H→V maps);
- iav-merged: the LM with `W_b + α W_a` folded into its `lm_head` (`models.merge.merged_lm_head`),
  what `alignheads merge` exports;
- calm: a CALM head (rank 32) with `AlignedLM` at α = 1 (the frozen lm_head + a rank-32 map + the gate
  and the running context tracked over the KV cache);
- genarm: `models.genarm.genarm_generate` (base + an equally sized reward LM, each with its own KV
  cache, `log π_base + α log π_r` per step);
- iav@0, calm@0 (diagnostics): the heads at α = 0, which skip the steering term (IAV's second
  H→V map, CALM's modulation) but keep the rest (the wrapper; CALM's context tracking), so the
  difference to the base and to α = 1 splits a head's cost into its parts;
- dials-3: three unmerged IAV dials on one LM (`AlignedLM(model, {name: head})`, `models.dials`)
  at α = (1, 0.5, 1), one α vector per call: the three `W_a` fold into one matrix, so the step
  costs one extra H→V map, like one IAV head;
- dials-3-calm: three CALM dials (rank 32 each) at that α: their D's and U's stacked into one
  H→3R and one 3R→V map, one context tracked for all;
- genarm-3: multi-objective GenARM (`models.genarm.multi_genarm_generate`: the base plus three
  reward LMs of the same size, each with its own KV cache, `log π_base + Σ_i α_i log π_r_i` at
  α = (1, 0.5, 1)): 4 forwards per token.

Speed does not depend on the weights: the LMs and the heads are randomly initialised (heads from
`models.registry.new_head`, their zero-initialised parts filled with noise). tokens/s = new tokens
of the batch / wall time of the call (the prompt's prefill included). The variants are interleaved
in every repeat, so a slow spell of a shared machine hits all of them; the ratio to the base is
given as the median of the per-repeat ratios (the best tokens/s are printed beside it). Checks
printed with it: the merged IAV decodes the unmerged head's greedy tokens, and three IAV dials
their merge's (`models.merge.merged_dials_head`, `W_lm + Σ α_i W_a_i`).

α-sweep: 5 values of α decoded in one batched call (`AlignedLM.alpha_sweep_generate`: the
prompts replicated per α, one α per row) against 5 separate `AlignedLM.generate(alpha=...)` calls.

Profile: forward hooks time the output layer inside one `generate()` call of the base (its
lm_head), iav, calm, dials-3 and dials-3-calm (the steered layer: head(s) + frozen lm_head): its
share of the call's time shows what the heads add per step (an unmerged IAV, and three IAV dials,
pay the base's H→V map about once more).

The targets printed: iav and calm >= 0.95x the base (0.97x on the GPU preset), iav-merged 1.00x,
each >= 1.8x genarm; dials-3 and dials-3-calm >= 0.90x the base.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from common import (
    LLAMA_7B,
    interleaved,
    machine_line,
    print_table,
    random_llama,
    synchronize,
    tiny_world_shape,
)
from torch import Tensor, nn

from alignheads.models import AlignedLM, LogitHead, new_head
from alignheads.models.kv_cache import with_prefix_cache
from alignheads.models.merge import merged_dials_head, merged_lm_head

VARIANTS = (
    "base",
    "iav",
    "iav-merged",
    "calm",
    "genarm",
    "iav@0",
    "calm@0",
    "dials-3",
    "dials-3-calm",
    "genarm-3",
)
# diagnostics: the heads at α = 0 skip their steering term (IAV: the second H→V map; CALM: the
# modulation) but keep everything else (the wrapper; CALM's context tracking over the KV cache),
# so they split a head's cost into its parts
ALPHA = 1.0
DIALS_TARGET = 0.90  # 3 dials against the base, tokens/s (CPU preset)
DIALS = ("helpful", "polite", "brief")
DIAL_ALPHA = (1.0, 0.5, 1.0)  # one α per dial (and per reward LM of genarm-3), uniform per call
PAD = 0


@dataclass
class Setup:
    model: nn.Module  # the base LM (heads are installed into it for their calls, then removed)
    reward_lms: list[nn.Module]  # GenARM's reward LMs (genarm: the first; genarm-3: all three)
    heads: dict[str, LogitHead]
    dials: dict[str, dict[str, LogitHead]]  # "iav" / "calm": three dials each, named DIALS
    merged: nn.Module  # W_b + α W_a as one nn.Linear
    merged_dials: nn.Module  # W_lm + Σ α_i W_a_i of the IAV dials as one nn.Linear
    device: torch.device
    description: str


def noisy_head(kind: str, model: nn.Module, seed: int) -> LogitHead:
    """A head from the registry with its zero-initialised parts filled with small noise (a trained
    head is not zero; the cost is the same, but the merged/unmerged equality check needs it)."""
    head = new_head(kind, model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        part = head.align.weight if kind == "iav" else head.up.weight
        noise = torch.randn(part.shape, generator=gen) * 0.02
        part.copy_(noise.to(part.dtype))
    return head.eval().requires_grad_(False)


def build(args: argparse.Namespace) -> Setup:
    gpu = args.preset == "gpu"
    device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if gpu:
        shape, layers = LLAMA_7B, args.layers or 32
        what = "7B-shaped random Llama"
    else:
        shape, layers = tiny_world_shape()
        layers = args.layers or layers
        what = "tiny world's shape (configs/tiny.yaml), random Llama"
    model = random_llama(shape, layers, device, dtype, seed=0)
    reward_lms = [random_llama(shape, layers, device, dtype, seed=seed) for seed in (1, 2, 3)]
    # no EOS: every row decodes all the new tokens (random weights would emit EOS at random)
    model.generation_config.eos_token_id = None
    heads = {"iav": noisy_head("iav", model, 1), "calm": noisy_head("calm", model, 2)}
    # IAV dials keep the LM's lm_head as W_b (new_head copies it; only W_a gets noise)
    dials = {
        kind: {name: noisy_head(kind, model, 10 * i + j) for j, name in enumerate(DIALS)}
        for i, kind in enumerate(("iav", "calm"), start=1)
    }
    merged = merged_lm_head(heads["iav"], ALPHA)
    merged_dials = merged_dials_head(
        model.get_output_embeddings(), dials["iav"], dict(zip(DIALS, DIAL_ALPHA, strict=True))
    )
    desc = (
        f"{what}: {layers} layers, H = {shape['hidden_size']}, V = {shape['vocab_size']}, {args.dtype}; "
        f"CALM rank {heads['calm'].config.rank}; GenARM reward LMs of the same shape; "
        f"dials {', '.join(DIALS)} at alpha = {DIAL_ALPHA}"
    )
    return Setup(model, reward_lms, heads, dials, merged, merged_dials, device, desc)


# --------------------------------------------------------------------------- the variants


@contextmanager
def output_layer(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    original = model.get_output_embeddings()
    model.set_output_embeddings(layer)
    try:
        yield
    finally:
        model.set_output_embeddings(original)


def decoders(setup: Setup, new_tokens: int) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """name -> (input_ids, attention_mask) -> sequences, one per variant."""
    model = setup.model
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": PAD}

    def base(ids: Tensor, mask: Tensor) -> Tensor:
        return model.generate(input_ids=ids, attention_mask=mask, **with_prefix_cache(model, kw))

    def installed(
        heads: LogitHead | dict[str, LogitHead], alpha: object
    ) -> Callable[[Tensor, Tensor], Tensor]:
        def run(ids: Tensor, mask: Tensor) -> Tensor:
            aligned = AlignedLM(model, heads, alpha=alpha)
            try:
                return aligned.generate(input_ids=ids, attention_mask=mask, **kw)
            finally:
                aligned.remove()

        return run

    def layer(linear: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        def run(ids: Tensor, mask: Tensor) -> Tensor:
            with output_layer(model, linear):
                return model.generate(input_ids=ids, attention_mask=mask, **with_prefix_cache(model, kw))

        return run

    guided = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None, "pad_token_id": PAD}

    def genarm(ids: Tensor, mask: Tensor) -> Tensor:
        from alignheads.models.genarm import genarm_generate

        return genarm_generate(model, setup.reward_lms[0], ids, mask, alpha=ALPHA, **guided)

    def genarm_3(ids: Tensor, mask: Tensor) -> Tensor:
        from alignheads.models.genarm import multi_genarm_generate

        return multi_genarm_generate(model, setup.reward_lms, ids, mask, alphas=list(DIAL_ALPHA), **guided)

    return {
        "base": base,
        "iav": installed(setup.heads["iav"], ALPHA),
        "iav-merged": layer(setup.merged),
        "calm": installed(setup.heads["calm"], ALPHA),
        "iav@0": installed(setup.heads["iav"], 0.0),
        "calm@0": installed(setup.heads["calm"], 0.0),
        "genarm": genarm,
        "dials-3": installed(setup.dials["iav"], DIAL_ALPHA),
        "dials-3-calm": installed(setup.dials["calm"], DIAL_ALPHA),
        "genarm-3": genarm_3,
        "dials-3-merged": layer(setup.merged_dials),  # the check only: not timed
    }


def sweep_decoders(
    setup: Setup, kind: str, alphas: list[float], new_tokens: int
) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """'separate': one AlignedLM.generate per α; 'batched': one alpha_sweep_generate for all."""
    model, head = setup.model, setup.heads[kind]
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": PAD}

    def separate(ids: Tensor, mask: Tensor) -> Tensor:
        aligned = AlignedLM(model, head)
        try:
            outs = [aligned.generate(input_ids=ids, attention_mask=mask, alpha=a, **kw) for a in alphas]
        finally:
            aligned.remove()
        return torch.stack(outs)

    def batched(ids: Tensor, mask: Tensor) -> Tensor:
        aligned = AlignedLM(model, head)
        try:
            return aligned.alpha_sweep_generate(ids, mask, alphas, **kw)
        finally:
            aligned.remove()

    return {"separate": separate, "batched": batched}


def prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen).to(device)
    return ids, torch.ones_like(ids)


@contextmanager
def timed(module: nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Accumulate the wall seconds spent inside `module`'s forward calls into the yielded [total]."""
    spent, started = [0.0], [0.0]

    def before(*_):
        synchronize(device)
        started[0] = time.perf_counter()

    def after(*_):
        synchronize(device)
        spent[0] += time.perf_counter() - started[0]

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


def output_layer_shares(setup: Setup, ids: Tensor, mask: Tensor, new_tokens: int) -> dict[str, float]:
    """Share of one `generate()` call's wall time spent in the output layer (forward hooks): the
    LM's lm_head for the base, the steered layer (head(s) + frozen lm_head) for iav, calm and the dials."""
    model = setup.model
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "use_cache": True, "pad_token_id": PAD}
    installs = {
        "iav": (setup.heads["iav"], ALPHA),
        "calm": (setup.heads["calm"], ALPHA),
        "dials-3": (setup.dials["iav"], DIAL_ALPHA),
        "dials-3-calm": (setup.dials["calm"], DIAL_ALPHA),
    }
    shares = {}
    for name in ("base", *installs):
        aligned = AlignedLM(model, installs[name][0], alpha=installs[name][1]) if name != "base" else None
        try:
            with timed(model.get_output_embeddings(), setup.device) as spent:
                synchronize(setup.device)
                t = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, **with_prefix_cache(model, kw))
                synchronize(setup.device)
                shares[name] = spent[0] / (time.perf_counter() - t)
        finally:
            if aligned is not None:
                aligned.remove()
    return shares


# --------------------------------------------------------------------------- the run


def measure_batch(setup: Setup, args: argparse.Namespace, batch: int) -> dict:
    vocab = setup.model.config.vocab_size
    ids, mask = prompts(batch, args.prompt_len, vocab, setup.device, seed=batch)
    runs = decoders(setup, args.new_tokens)
    outputs = {name: fn(ids, mask) for name, fn in runs.items()}  # warm-up, and the outputs to check
    for name, seq in outputs.items():
        if seq.shape != (batch, args.prompt_len + args.new_tokens):
            raise RuntimeError(
                f"{name}: decoded {tuple(seq.shape)}, expected {batch} x {args.prompt_len}+{args.new_tokens}"
            )
    new = slice(args.prompt_len, None)
    merged_equal = (outputs["iav"][:, new] == outputs["iav-merged"][:, new]).float().mean().item()
    dials_equal = (outputs["dials-3"][:, new] == outputs["dials-3-merged"][:, new]).float().mean().item()
    times = interleaved(
        {name: (lambda fn=runs[name]: fn(ids, mask)) for name in VARIANTS}, args.repeats, setup.device
    )

    sweep = {}
    for kind in setup.heads:
        fns = sweep_decoders(setup, kind, args.alphas, args.new_tokens)
        sep, bat = fns["separate"](ids, mask), fns["batched"](ids, mask)
        same = (sep[:, :, new] == bat[:, :, new]).float().mean().item()
        sweep[kind] = (
            interleaved(
                {n: (lambda fn=fn: fn(ids, mask)) for n, fn in fns.items()}, args.sweep_repeats, setup.device
            ),
            same,
        )
    shares = output_layer_shares(setup, ids, mask, args.new_tokens)
    return {
        "times": times,
        "merged_equal": merged_equal,
        "dials_equal": dials_equal,
        "sweep": sweep,
        "shares": shares,
    }


def median_ratio(times: dict[str, list[float]], name: str, ref: str = "base") -> float:
    """Median over the repeats of (time of `ref` / time of `name`) in the same repeat."""
    return statistics.median(r / n for r, n in zip(times[ref], times[name], strict=True))


def report(setup: Setup, args: argparse.Namespace, results: dict[int, dict]) -> None:
    gpu = args.preset == "gpu" and setup.device.type == "cuda"
    target = 0.97 if gpu else 0.95
    print(
        machine_line(
            f"decoding benchmark, preset {args.preset}{' (dry run)' if args.dry_run else ''}", setup.device
        )
    )
    print(setup.description)
    print(
        f"greedy, KV cache, prompt {args.prompt_len} + {args.new_tokens} new tokens, alpha = {ALPHA}; "
        f"{args.repeats} interleaved repeats (sweep: {args.sweep_repeats}); tokens/s = batch x new tokens / call time"
    )
    rows = []
    for batch, res in results.items():
        times = res["times"]
        for name in VARIANTS:
            best, median = min(times[name]), statistics.median(times[name])
            tokens = batch * args.new_tokens
            r_med = median_ratio(times, name)
            if name in ("iav", "calm"):
                goal = f">= {target:.2f}"
            elif name in ("dials-3", "dials-3-calm"):
                goal = f">= {DIALS_TARGET:.2f}"
            elif name == "iav-merged":
                goal = "1.00"
            else:
                goal = ""
            rows.append(
                [
                    f"{name}",
                    str(batch),
                    f"{tokens / best:.1f}",
                    f"{tokens / median:.1f}",
                    f"{r_med:.3f}",
                    goal,
                    f"{median_ratio(times, name, ref='genarm'):.2f}",
                ]
            )
    print_table(
        [
            ("variant", 12),
            ("batch", 5),
            ("tok/s best", 10),
            ("tok/s median", 12),
            ("x base (median)", 15),
            ("target", 7),
            ("genarm time / this (median)", 8),
        ],
        rows,
    )
    print(
        f"targets: iav and calm >= {target:.2f}x the base, iav-merged 1.00x, each >= 1.8x genarm; "
        f"dials-3 (3 IAV dials) and dials-3-calm >= {DIALS_TARGET:.2f}x the base; genarm-3 runs 4 LM "
        "forwards per token; the medians of the per-repeat ratios are the robust figures on a shared machine"
    )
    for batch, res in results.items():
        sh = res["shares"]
        print(
            f"batch {batch}: iav vs iav-merged greedy tokens equal: {res['merged_equal']:.1%}; dials-3 vs its "
            f"merge: {res['dials_equal']:.1%}; profile (share of generate() time in the output layer): base "
            f"{sh['base']:.1%}, iav {sh['iav']:.1%}, calm {sh['calm']:.1%}, dials-3 {sh['dials-3']:.1%}, "
            f"dials-3-calm {sh['dials-3-calm']:.1%}"
        )
    print(
        f"alpha sweep: {len(args.alphas)} alphas {args.alphas} in one batched call vs {len(args.alphas)} separate calls"
    )
    rows = []
    for batch, res in results.items():
        for kind, (times, same) in res["sweep"].items():
            sep, bat = min(times["separate"]), min(times["batched"])
            tokens = len(args.alphas) * batch * args.new_tokens
            rows.append(
                [
                    kind,
                    str(batch),
                    f"{len(args.alphas) * batch}",
                    f"{sep:.2f}",
                    f"{bat:.2f}",
                    f"{tokens / sep:.1f}",
                    f"{tokens / bat:.1f}",
                    f"{statistics.median(a / b for a, b in zip(times['separate'], times['batched'], strict=True)):.2f}",
                    f"{same:.1%}",
                ]
            )
    print_table(
        [
            ("head", 5),
            ("batch", 5),
            ("rows batched", 12),
            ("separate s", 10),
            ("batched s", 9),
            ("separate tok/s", 14),
            ("batched tok/s", 13),
            ("speed-up (median)", 8),
            ("same tokens", 11),
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU; default 1)")
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats of the variants")
    parser.add_argument("--sweep-repeats", type=int, default=5, help="interleaved repeats of the alpha sweep")
    parser.add_argument("--alphas", default="0,0.5,1,1.5,2", help="the sweep's alphas, comma-separated")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's: tiny 3, gpu 32)")
    parser.add_argument("--dtype", help="model dtype (default: cpu float32, gpu bfloat16)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes (gpu: 1 layer unless --layers; 8-token prompts, 4 new tokens, batches 1 and 2, "
        "1 repeat): checks the set-up on any machine",
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.preset == "gpu" else "float32")
    if args.dry_run:
        if args.preset == "gpu" and args.layers is None:
            args.layers = 1
        args.prompt_len, args.new_tokens, args.batches = 8, 4, "1,2"
        args.repeats, args.sweep_repeats = 1, 1
    args.alphas = [float(a) for a in args.alphas.split(",")]
    torch.set_num_threads(args.threads)

    setup = build(args)
    with torch.inference_mode():
        results = {b: measure_batch(setup, args, b) for b in (int(x) for x in args.batches.split(","))}
    report(setup, args, results)


if __name__ == "__main__":
    main()
