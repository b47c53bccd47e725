"""Scale benchmark: head training on 1x and 8x the data; peak memory should stay flat, time grow linearly.

    .venv/bin/python benchmarks/scale_bench.py             # the test-size tiny world, 1x and 8x its pairs
    .venv/bin/python benchmarks/scale_bench.py --dry-run   # a smaller world, 1x and 2x, IAV only (seconds)

The test-size tiny world is built (world -> data -> tokenize) in a temporary store, with its
pretraining cut to `--pretrain-steps` (the pairs come from the world's corpus, not its model, and
the cost of training a head does not depend on the LM's weights); its training pairs are then replicated 1x and 8x into `tokenize` artifacts of their own (ids suffixed per copy,
the held-out pairs once), and the real reference pass writes a refcache for each (k = 64,
`--pairs-per-shard` pairs per shard, the same at both sizes, since streaming holds one shard at a
time). Each head (IAV with `kl: topk`, CALM; configs/tiny.yaml's settings, one epoch, no
evaluation) is then trained by the project's training loop (`tasks.train.make_job` +
`tasks.training.loop.train`, which reads the cache with `PairStream`) in a fresh subprocess per
(head, size), the sizes interleaved over `--repeats` rounds.

Peak memory: the resident-set high-water mark (VmHWM) of that subprocess *during training*:
the child loads the model and opens the streams, resets its high-water mark
(`/proc/self/clear_refs`), records its resident set, trains, and reads VmHWM again. Reported:
the resident set at the start, the peak during training, and the growth (peak − start). RSS
counts everything the process touches (Python objects, Arrow buffers, torch's allocator), not
only torch tensors. Wall time: `train` alone (the loop, its data reading, the final
checkpoint), best of the repeats, and per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import MIB, machine_line, prepare_tiny_world, print_table

HEADS = ("iav", "calm")


# --------------------------------------------------------------------------- inputs


def replicated_tokenized(store: Path, source: Path, factor: int):
    """A `tokenize` artifact holding the source's training pairs `factor` times (ids suffixed
    `~copy`) and its held-out pairs once, written with the storage layer like the real stage's."""
    import pyarrow as pa

    from alignheads.storage.artifacts import ArtifactContent, ensure_artifact
    from alignheads.storage.fingerprint import artifact_key
    from alignheads.storage.manifest import read_manifest
    from alignheads.storage.tables import read_table, write_table
    from alignheads.tasks.tokenize import STAGE, TOKENIZE_VERSION

    manifest = read_manifest(source, STAGE)
    config = {**manifest.config, "replicate_train": factor}
    inputs = {**manifest.inputs, "replicated_from": manifest.key}

    def build(staging: Path) -> ArtifactContent:
        table = read_table(source, "tokenized")
        train = table.filter(pa.compute.equal(table.column("split"), "train"))
        test = table.filter(pa.compute.equal(table.column("split"), "test"))
        copies = []
        for c in range(factor):
            ids = pa.array([f"{i}~{c}" for i in train.column("id").to_pylist()], pa.string())
            copies.append(train.set_column(train.schema.get_field_index("id"), "id", ids))
        out = pa.concat_tables([*copies, test])
        return ArtifactContent(
            tables={"tokenized": write_table(out, staging, "tokenized")}, info={"rows": out.num_rows}
        )

    key = artifact_key(STAGE, config, inputs, TOKENIZE_VERSION)
    return ensure_artifact(store, STAGE, key, TOKENIZE_VERSION, config, inputs, build)


def train_configs(dry_run: bool) -> dict:
    """configs/tiny.yaml's head settings, one epoch, evaluation and intermediate checkpoints off."""
    from alignheads.config import CALMTrainConfig, IAVTrainConfig

    common = {
        "lr": 2e-3,
        "batch_size": 16,
        "epochs": 1,
        "lambda_nll": 1.0,
        "eval_every": 10**9,
        "checkpoint_every": 10**9,
        "resume": False,
    }
    cfgs = {"iav": IAVTrainConfig(kl="topk", **common), "calm": CALMTrainConfig(rank=32, **common)}
    return {"iav": cfgs["iav"]} if dry_run else cfgs


def prepare(store: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Train plans per (head, factor), and the pairs and shards per factor."""
    from alignheads.config import ModelConfig, RefPassConfig
    from alignheads.models.reference import load_reference
    from alignheads.storage.manifest import read_manifest
    from alignheads.tasks.refpass import plan_refpass, run_refpass
    from alignheads.tasks.train import plan_train
    from alignheads.world.build import tiny_test_config

    # The pairs come from the world's corpus, not from its model, and the cost of training a head
    # does not depend on the LM's weights: pretraining is cut short (the test-size world's pairs,
    # tokenizer and model shape, a barely trained model)
    world_cfg = tiny_test_config(pretrain_steps=args.pretrain_steps, report_samples=8)
    if args.dry_run:  # a smaller world: 64 training pairs
        world_cfg = tiny_test_config(
            n_train_pairs=64,
            n_test_pairs=16,
            pretrain_steps=args.pretrain_steps,
            n_pretrain_dialogues=200,
            report_samples=4,
        )
    world = prepare_tiny_world(store, world_cfg)
    reference = load_reference(world.model_dir, device="cpu")
    model = {
        "name_or_path": world.model_dir,
        "revision": None,
        "dtype": "float32",
        "trust_remote_code": False,
    }
    plans, sizes = {}, {}
    for factor in args.factors:
        tok = replicated_tokenized(store, world.tokenized.path, factor)
        rcfg = RefPassConfig(k=64, pairs_per_shard=args.pairs_per_shard, device="cpu")
        ref = run_refpass(
            store, plan_refpass(rcfg, ModelConfig(), world.model_dir, tok.path, world.fingerprint), reference
        )
        shards = read_manifest(ref.path).tables["refcache"]
        sizes[factor] = {
            "pairs": tok.manifest.info["rows"],
            "shards": len(shards),
            "bytes": sum((ref.path / s.path).stat().st_size for s in shards),
        }
        for kind, cfg in train_configs(args.dry_run).items():
            plans[(kind, factor)] = plan_train(kind, cfg, ref.path, model)
    return plans, sizes


# --------------------------------------------------------------------------- the child


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(plan_file: Path, checkpoints: Path) -> None:
    """Train one plan's head; print one JSON line: seconds, steps, rss_start, rss_peak (bytes)."""
    import gc

    import torch

    from alignheads.tasks.train import TrainPlan, make_job
    from alignheads.tasks.training.loop import train

    torch.set_num_threads(1)
    plan = TrainPlan(**json.loads(plan_file.read_text()))
    job = make_job(plan, checkpoints, progress=False)
    job.eval = None  # training alone: evaluation is a separate pass over the held-out pairs
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = _status_kib("VmRSS")
    t = time.perf_counter()
    result = train(job)
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {"seconds": seconds, "steps": result.steps, "rss_start": start * 1024, "rss_peak": peak * 1024}
        )
    )


def run_child(plan, work: Path, name: str) -> dict:
    plan_file = work / f"{name}.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    cmd = [sys.executable, __file__, "--child", str(plan_file), "--checkpoints", str(work / f"ckpt-{name}")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training child {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factors", default="1,8", help="data sizes as multiples of the training pairs")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (best time kept)")
    parser.add_argument("--pairs-per-shard", type=int, default=128, help="refcache shard size (both sizes)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=20,
        help="the world's pretraining (the cost measured does not depend on it)",
    )
    parser.add_argument("--store", type=Path, help="store to build/reuse the inputs in (default: a temp dir)")
    parser.add_argument("--dry-run", action="store_true", help="small world, 1x and 2x, IAV only, 1 round")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.checkpoints)
        return
    if args.dry_run:
        args.factors, args.repeats, args.pairs_per_shard = "1,2", 1, 32
    args.factors = [int(f) for f in args.factors.split(",")]
    import torch

    torch.set_num_threads(1)  # the reference passes: tiny models run fastest on one thread

    with tempfile.TemporaryDirectory() as tmp:
        store = (args.store or Path(tmp) / "store").resolve()
        plans, sizes = prepare(store, args)
        work = Path(tmp) / "work"
        work.mkdir()
        runs: dict[tuple[str, int], list[dict]] = {key: [] for key in plans}
        for r in range(args.repeats):
            for (kind, factor), plan in plans.items():
                runs[(kind, factor)].append(run_child(plan, work, f"{kind}-{factor}-{r}"))

    print(machine_line("scale benchmark" + (" (dry run)" if args.dry_run else "")))
    print(
        "data: the test-size tiny world's training pairs replicated; refcache k = 64, "
        f"{args.pairs_per_shard} pairs per shard; one epoch, batch 16; a fresh subprocess per (head, size)"
    )
    print("memory: resident set (VmHWM) of the training process during train, from a reset high-water mark")
    for factor, s in sizes.items():
        print(
            f"  {factor}x: {s['pairs']} pairs (incl. held-out), {s['shards']} refcache shards, {s['bytes'] / MIB:.1f} MiB"
        )
    base = args.factors[0]
    rows, verdicts = [], []
    for (kind, factor), results in runs.items():
        best = min(r["seconds"] for r in results)
        first = runs[(kind, base)]
        peak = max(r["rss_peak"] for r in results)
        growth = max(r["rss_peak"] - r["rss_start"] for r in results)
        base_peak = max(r["rss_peak"] for r in first)
        base_best = min(r["seconds"] for r in first)
        steps = results[0]["steps"]
        rows.append(
            [
                kind,
                f"{factor}x",
                str(steps),
                f"{best:.2f}",
                f"{statistics.median(r['seconds'] for r in results):.2f}",
                f"{best / steps * 1e3:.1f}",
                f"{best / base_best:.2f}",
                f"{max(r['rss_start'] for r in results) / MIB:.0f}",
                f"{peak / MIB:.0f}",
                f"{growth / MIB:.1f}",
                f"{peak / base_peak:.3f}",
            ]
        )
        if factor != base:
            verdicts.append(
                f"  {kind}: peak {factor}x / {base}x = {peak / base_peak:.3f} (target <= 1.1: "
                f"{'met' if peak / base_peak <= 1.1 else 'not met'}); time {factor}x / {base}x = "
                f"{best / base_best:.2f} for {factor / base:.0f}x the steps"
            )
    print_table(
        [
            ("head", 5),
            ("data", 4),
            ("steps", 5),
            ("best s", 7),
            ("median s", 8),
            ("ms/step", 7),
            ("time / 1x", 9),
            ("RSS start MiB", 13),
            ("RSS peak MiB", 12),
            ("growth MiB", 10),
            ("peak / 1x", 9),
        ],
        rows,
    )
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
