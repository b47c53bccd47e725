"""Entry point for multi-process training: `accelerate launch -m alignheads.tasks.training.launch PLAN OUT`.

PLAN is a train plan as JSON (what `tasks.train.plan_train` returns); every process builds
the same head and stream, takes its share of each step's micro-batches, and process 0 writes
OUT/<saved_as> (the trained head or model) and OUT/result.json (steps, metrics history). The train stage
runs this through `accelerate launch` when `train.<head>.num_processes` is above 1; it also
works by hand on GPUs (`--multi_gpu`) or CPUs (gloo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_from_plan(plan_file: Path, out_dir: Path, checkpoint_dir: Path, progress: bool = True) -> None:
    from alignheads.tasks.train import TrainPlan, make_job, result_summary, save_trained
    from alignheads.tasks.training.loop import new_accelerator, train

    plan = TrainPlan(**json.loads(plan_file.read_text()))
    accelerator = new_accelerator(plan.settings.mixed_precision)
    job = make_job(plan, checkpoint_dir, progress=progress)
    result = train(job, accelerator)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_trained(plan, job, result, out_dir)
        summary = result_summary(result) | {"processes": accelerator.num_processes}
        (out_dir / "result.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()
    # tear the gloo/NCCL group down before the interpreter exits: a process that exits with it
    # alive can abort in its destructor ("terminate called without an active exception") after
    # its work is done, and the launcher then reports the run as failed
    accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignheads.tasks.training.launch", description=__doc__)
    parser.add_argument("plan", type=Path, help="train plan JSON")
    parser.add_argument("out", type=Path, help="output directory (head/ and result.json)")
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint directory (resume)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    train_from_plan(args.plan, args.out, args.checkpoints, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
