"""PEFT export benchmark: how closely a LoRA adapter of IAV's W_a reproduces the head, by rank.

(A script, not a module of the package: one command reproduces the BENCHMARKS.md table.)

    .venv/bin/python benchmarks/peft_export_bench.py             # the embedded default world
    .venv/bin/python benchmarks/peft_export_bench.py --dry-run   # the test-size world, fewer steps

Builds (or reuses, with --store) the tiny world, its reference cache and an IAV head trained with
configs/tiny.yaml's IAV settings, through the project's own stages (no Prefect). Then, for each
rank (full, 8, 32, 128; ranks at or above min(V, H) are full rank), `alignheads.tasks.export.
export_peft` writes the adapter, real PEFT loads it onto the base (`PeftModel.from_pretrained`),
and its logits at α = 1 are compared with the head's (`AlignedLM`) over the held-out pairs
(prompt + chosen response, every real position):

- rel. error W_a: ‖W_a − B A‖_F / ‖W_a‖_F (from the dropped singular values);
- max |Δz|: the largest logit difference; mean |Δz|;
- KL: mean per-position KL(π_head ‖ π_adapter) in nats;
- share of Δ: ‖z_adapter − z_head‖ / ‖z_head − z_base‖, the part of the head's own change that
  the adapter misses;
- argmax agree: share of positions where both pick the same next token;
- adapter bytes: adapter_model.safetensors on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from common import machine_line, prepare_tiny_world, print_table

RANKS = ("full", "8", "32", "128")


def trained_iav(store: Path, dry_run: bool):
    """(world, head directory): the tiny world through data, tokenize, the reference pass and IAV."""
    from alignheads.config import ModelConfig, read_config
    from alignheads.tasks.refpass import plan_refpass, run_refpass
    from alignheads.tasks.train import plan_train, run_train
    from alignheads.world.build import tiny_test_config

    cfg = read_config()
    world_cfg = tiny_test_config() if dry_run else cfg.world
    world = prepare_tiny_world(store, world_cfg)
    refpass = cfg.refpass.model_copy(update={"device": "cpu"})
    ref = run_refpass(
        store, plan_refpass(refpass, ModelConfig(), world.model_dir, world.tokenized.path, world.fingerprint)
    )
    iav = cfg.train.iav.model_copy(update={"epochs": 1} if dry_run else {})
    source = {
        "name_or_path": world.model_dir,
        "revision": None,
        "dtype": "float32",
        "trust_remote_code": False,
    }
    plan = plan_train("iav", iav, ref.path, source)
    trained = run_train(store, plan, progress=False)
    return world, trained.path / "head"


def held_out_batches(world, n_pairs: int, batch: int):
    """Left-padded (ids, mask) batches of prompt + chosen response of the first test pairs."""
    from alignheads.storage.tables import read_table

    rows = [r for r in read_table(world.tokenized.path, "tokenized").to_pylist() if r["split"] == "test"][
        :n_pairs
    ]
    pad = world.pad_id
    out = []
    for start in range(0, len(rows), batch):
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows[start : start + batch]]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        out.append((ids, mask))
    return out


@torch.no_grad()
def logits_of(model, batches) -> torch.Tensor:
    """Every real position's logits, (N, V) float64."""
    rows = []
    for ids, mask in batches:
        z = model(input_ids=ids, attention_mask=mask).logits
        rows.append(z[mask.bool()].double())
    return torch.cat(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--store", type=Path, help="store to build/reuse the world and head in (default: temp)"
    )
    parser.add_argument("--pairs", type=int, default=64, help="held-out pairs compared (default 64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="the test-size world, one training epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    from alignheads.loading import load_causal_lm
    from alignheads.models import load_aligned
    from alignheads.tasks.export import ADAPTER_WEIGHTS, export_peft

    with tempfile.TemporaryDirectory() as tmp:
        store = (args.store or Path(tmp) / "store").resolve()
        world, heads = trained_iav(store, args.dry_run)
        batches = held_out_batches(world, args.pairs, 16)
        base = load_causal_lm(world.model_dir)
        z_base = logits_of(base, batches)
        z_head = logits_of(load_aligned(heads, load_causal_lm(world.model_dir), alpha=1.0).model, batches)
        shift = (z_head - z_base).norm().item()
        rows = []
        for rank in RANKS:
            done = export_peft(
                heads, Path(tmp) / f"adapter-{rank}", rank=None if rank == "full" else int(rank)
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapted = PeftModel.from_pretrained(load_causal_lm(world.model_dir), done.out).eval()
            z = logits_of(adapted, batches)
            diff = z - z_head
            p_head = z_head.log_softmax(-1)
            kl = (p_head.exp() * (p_head - z.log_softmax(-1))).sum(-1).mean().item()
            agree = (z.argmax(-1) == z_head.argmax(-1)).double().mean().item()
            rows.append(
                [
                    f"{rank} (r={done.rank})",
                    f"{done.relative_error:.2e}",
                    f"{diff.abs().max().item():.2e}",
                    f"{diff.abs().mean().item():.2e}",
                    f"{kl:.2e}",
                    f"{diff.norm().item() / shift:.2e}",
                    f"{100 * agree:.1f}%",
                    f"{(done.out / ADAPTER_WEIGHTS).stat().st_size}",
                ]
            )
        cfg = base.config
    print(machine_line("peft export benchmark"))
    print(
        f"tiny world ({'test size' if args.dry_run else 'embedded default'}): V = {cfg.vocab_size}, "
        f"H = {cfg.hidden_size}; IAV trained with configs/tiny.yaml's settings; {z_head.shape[0]} held-out "
        f"positions; ‖z_head − z_base‖ = {shift:.3g}"
    )
    columns = [
        ("rank", 12),
        ("rel. error W_a", 14),
        ("max |Δz|", 9),
        ("mean |Δz|", 9),
        ("KL (nats)", 9),
        ("share of Δ", 10),
        ("argmax agree", 12),
        ("adapter bytes", 13),
    ]
    print_table(columns, rows)


if __name__ == "__main__":
    main()
