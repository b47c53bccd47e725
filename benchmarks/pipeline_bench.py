"""Pipeline benchmark: the cold embedded-default run, the fully cached re-run, and Prefect's own start-up.

    .venv/bin/python benchmarks/pipeline_bench.py               # cold run (minutes), then the rest
    .venv/bin/python benchmarks/pipeline_bench.py --reuse DIR   # the cached re-runs only, on the store
                                                                # an earlier `--keep DIR` left
    .venv/bin/python benchmarks/pipeline_bench.py --dry-run     # the script's plumbing only: plain
                                                                # `python -c` commands (a few seconds)

Every figure is the wall time of a fresh subprocess, so start-up and imports count as a user sees them:

- cold: `alignheads run --config configs/tiny.yaml --set store=<empty temporary store>`, once
  (with a copy of the config taken at the start, so that an edit of the file meanwhile does not
  change what the re-runs compute);
- cached: the same command on the same store, where every stage is complete;
- prefect: a trivial flow (`@flow def noop(): return 1`) in a fresh process, with the same
  settings and the same Prefect home: the start-up of Prefect's ephemeral API that any flow run
  without a server pays;
- import: `import alignheads.flows.pipeline` alone (what the run imports before it starts).

The cached run and the two baselines are interleaved over `--repeats` rounds (best and median
kept). The cached run's overhead is `cached − prefect`: the work of the pipeline itself when
nothing is recomputed (imports, planning, hashing inputs, checking artifacts, MLflow runs, the
report). Prefect's home and MLflow's store live in the temporary directory, so nothing on the
machine is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_line, print_table

ROOT = Path(__file__).resolve().parent.parent
NOOP_FLOW = "from prefect import flow\n\n@flow\ndef noop():\n    return 1\n\nnoop()\n"
IMPORT_ONLY = "import alignheads.flows.pipeline\n"
DRY_RUN = "print('Nothing recomputed: dry run')"
# issue 20's targets: the cached re-run's own work beyond Prefect's start-up, and the cold run
CACHED_TARGET_S = 5.0
COLD_TARGET_S = 300.0


def commands(args: argparse.Namespace, store: Path) -> dict[str, list[str]]:
    """name -> command line: the run (cold, then cached), the bare flow, the import."""
    python = sys.executable
    if args.dry_run:  # no Prefect, no pipeline: checks the timing, parsing and printing
        return {name: [python, "-c", DRY_RUN] for name in ("cached", "prefect", "import")}
    cli = str(Path(python).parent / "alignheads")
    return {
        "cached": [cli, "run", "--config", str(store.parent / "run.yaml"), "--set", f"store={store}"],
        "prefect": [python, "-c", NOOP_FLOW],
        "import": [python, "-c", IMPORT_ONLY],
    }


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of `cmd` (stdout and stderr to `log`); raises with the log's tail on failure."""
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); last lines of {log}:\n{tail}")
    return seconds


def stage_statuses(log: Path) -> str:
    """The run summary's last line about what was computed (or that nothing was)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    hits = [ln for ln in lines if ln.startswith(("Computed:", "Nothing recomputed"))]
    return hits[-1] if hits else "(no run summary found)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of cached run + baselines")
    parser.add_argument("--keep", type=Path, help="keep the logs and the store in this directory")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="a directory an earlier --keep left (its store and config snapshot): time the cached "
        "re-runs and the baselines on it, without the cold run",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="plain `python -c` commands in place of the run, the flow and the import (1 repeat)",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.repeats = 1

    if args.reuse and not (args.reuse / "run.yaml").is_file():
        parser.error(f"--reuse {args.reuse}: no run.yaml there (a directory `--keep` left)")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.reuse or args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        store = work / "store"
        env = {
            **os.environ,
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # the store's own sqlite database
        # a snapshot of the config: an edit of the repository's file during the run must not
        # turn the cached re-run into another cold one
        if not args.reuse:
            shutil.copyfile(args.config, work / "run.yaml")
        cmds = commands(args, store)
        load_before = os.getloadavg()[0]
        cold = None if args.reuse else run_timed(cmds["cached"], env, work / "cold.log")
        cold_status = "not run (--reuse)" if args.reuse else stage_statuses(work / "cold.log")
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for r in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(run_timed(cmd, env, work / f"{name}-{r}.log"))
        cached_status = [stage_statuses(work / f"cached-{r}.log") for r in range(args.repeats)]

    print(machine_line("pipeline benchmark"))
    what = "python -c (dry run)" if args.dry_run else f"alignheads run --config {args.config.name}"
    print(f"run: {what}; fresh subprocess each; load average (1 min) {load_before:.1f} before the first run")
    print(f"cold run: {cold_status}")
    for r, status in enumerate(cached_status):
        print(f"cached run {r + 1}: {status}")
    best = {name: min(v) for name, v in times.items()}
    rows = [] if cold is None else [["cold run (empty store)", f"{cold:.1f}", f"{cold:.1f}", "1"]]
    labels = {
        "cached": "cached re-run (same store)",
        "prefect": "bare Prefect flow",
        "import": "import alignheads.flows.pipeline",
    }
    for name, label in labels.items():
        rows.append([label, f"{best[name]:.1f}", f"{statistics.median(times[name]):.1f}", str(args.repeats)])
    print_table([("process", 32), ("best s", 8), ("median s", 8), ("runs", 4)], rows)
    overhead = best["cached"] - best["prefect"]
    verdict = "met" if overhead <= CACHED_TARGET_S else "not met"
    line = f"cached re-run beyond Prefect's start-up: {overhead:.1f} s (target <= {CACHED_TARGET_S:.0f} s: {verdict})"
    if cold is not None:
        cold_verdict = "met" if cold <= COLD_TARGET_S else "not met"
        line += (
            f"; cold run {cold:.1f} s (target <= {COLD_TARGET_S:.0f} s: {cold_verdict}); "
            f"cold / cached = {cold / best['cached']:.1f}x"
        )
    print(line)


if __name__ == "__main__":
    main()
