"""Helpers of the reliability tests: a small run config, pipeline processes that are killed when a
file appears in the store, and a comparable description of every artifact in a store.

Nothing here reaches into the product: a kill point is a path pattern in the store (a shard's
done-record, a checkpoint directory, a stage's staging directory), watched from outside.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignheads.storage.manifest import MANIFEST, verify_artifact
from alignheads.world.build import tiny_test_config

# Manifest info that records how a build went (where it resumed, how long it took), not what it built.
VOLATILE_INFO = {"resumed_from"}


def small_world() -> dict[str, Any]:
    """A world a few seconds to build: 64 train / 32 test pairs, 100 pretraining steps."""
    return tiny_test_config(
        n_train_pairs=64,
        n_test_pairs=32,
        pretrain_steps=100,
        n_pretrain_dialogues=500,
        report_samples=8,
        report_max_new_tokens=16,
    ).model_dump(mode="json")


def small_run(store: Path, name: str = "reliability", alphas: tuple[float, ...] = (0, 1)) -> dict[str, Any]:
    """A whole run in seconds of work: 4 refpass shards, 16 steps per head with a checkpoint
    every 4, generations of 8 prompts at each α."""
    return {
        "name": name,
        "store": str(store),
        "world": small_world(),
        "tokenize": {"max_prompt_length": 48, "max_response_length": 32},
        "refpass": {"k": 16, "pairs_per_shard": 24, "batch_size": 8},
        "train": {
            "iav": {"lr": 1e-2, "batch_size": 8, "epochs": 2, "eval_every": 4, "checkpoint_every": 4},
            "calm": {
                "lr": 1e-2,
                "batch_size": 8,
                "epochs": 2,
                "rank": 4,
                "eval_every": 4,
                "checkpoint_every": 4,
            },
        },
        "sweep": {"alphas": list(alphas), "n_prompts": 8, "max_new_tokens": 16, "batch_size": 4},
        "evaluate": {"target_kls": []},  # no α calibration here (tested on its own)
    }


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment of a pipeline subprocess: the session's Prefect API (no ephemeral server per
    process), offline, one thread (as the in-process runs of the test session)."""
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_ENABLE_TELEMETRY="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TQDM_DISABLE="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def cli_command(config: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "alignheads"), "run", "--config", str(config)]


def store_paths(store: Path) -> list[str]:
    """Every path under the store (relative, POSIX), outside Prefect's cache and MLflow's artifacts."""
    out = []
    for dirpath, dirnames, filenames in os.walk(store):
        rel = os.path.relpath(dirpath, store)
        if rel.startswith((".prefect-results", "mlruns")):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            out.append(name if rel == "." else f"{rel}/{name}")
    return out


def appeared(*patterns: str) -> Callable[[Path], str | None]:
    """A kill trigger: the first store path matching all `patterns` in turn (fnmatch, one each)."""

    def trigger(store: Path) -> str | None:
        paths = store_paths(store)
        hit = None
        for pattern in patterns:
            hit = next((p for p in paths if fnmatch.fnmatchcase(p, pattern)), None)
            if hit is None:
                return None
        return hit

    return trigger


@dataclass
class Outcome:
    returncode: int
    killed_at: str | None  # the store path whose appearance triggered the kill
    output: str


def run_pipeline(
    config: Path,
    env: dict[str, str],
    store: Path,
    kill_when: Callable[[Path], str | None] | None = None,
    timeout: float = 240.0,
) -> Outcome:
    """Run `alignheads run` in a subprocess; SIGKILL it as soon as `kill_when(store)` names a path."""
    log = store.parent / f"run-{time.time_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli_command(config), env=env, stdout=out, stderr=subprocess.STDOUT)
        killed_at = None
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pipeline still running after {timeout} s (log: {log})")
                if kill_when is not None and store.is_dir():
                    killed_at = kill_when(store)
                    if killed_at is not None:
                        os.kill(proc.pid, signal.SIGKILL)
                        break
                time.sleep(0.003)
        finally:
            if proc.poll() is None and killed_at is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return Outcome(proc.returncode, killed_at, log.read_text(errors="replace"))


def final_artifacts(store: Path) -> dict[str, list[Path]]:
    """{stage: [artifact dirs at their final (non-hidden) path]} of a store."""
    out: dict[str, list[Path]] = {}
    for stage_dir in sorted(p for p in store.iterdir() if p.is_dir()):
        if stage_dir.name.startswith(".") or stage_dir.name in {"mlruns", "checkpoints"}:
            continue
        found = sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if found:
            out[stage_dir.name] = found
    return out


def assert_nothing_partial_is_final(store: Path) -> int:
    """Every artifact at a final path verifies in full (manifest, every shard's rows and checksum);
    every checkpoint `step-*` directory is complete. Returns the number of artifacts checked."""
    n = 0
    for stage, dirs in final_artifacts(store).items():
        for path in dirs:
            assert (path / MANIFEST).is_file(), f"{path}: at its final path without a manifest"
            verify_artifact(path, stage)
            n += 1
    for step in (store / "checkpoints").glob("*/*/step-*"):
        assert sorted(p.name for p in step.iterdir()) == ["state.json", "state.safetensors"], step
    return n


def leftovers(store: Path) -> list[str]:
    """Hidden work files and directories of stages (staging dirs, temp files, shard records, corrupt
    artifacts moved aside) still in the store; lock files and Prefect's cache are not leftovers."""
    out = []
    for rel in store_paths(store):
        name = rel.rsplit("/", 1)[-1]
        if "/.locks" in f"/{rel}" or name.endswith(".lock"):
            continue
        if name.startswith(".") and (
            ".tmp-" in name or name.endswith((".work", ".shards")) or "corrupt" in name
        ):
            out.append(rel)
    return sorted(out)


def _normalise(value: Any, store: Path) -> Any:
    """Manifest contents with the store's own path and run ids taken out."""
    if isinstance(value, dict):
        return {
            k: _normalise(v, store)
            for k, v in value.items()
            if k not in VOLATILE_INFO and k != "run_id" and not k.endswith(("_seconds", "ms_per_token"))
        }
    if isinstance(value, list):
        return [_normalise(v, store) for v in value]
    if isinstance(value, str):
        return value.replace(str(store), "<store>")
    if isinstance(value, float) and value != value:
        return "nan"  # NaN == NaN is false; the same NaN in both runs is a match
    return value


# the report's matched-KL files carry measured decoding times (ms per token): compared through the
# report manifest's `matched_kl` rows, which `_normalise` strips of those times
MEASURED_FILES = {"matched_kl.parquet", "matched_kl.md"}


def _file_content(path: Path, sha256: str, store: Path) -> Any:
    """A JSON file's content with the store path taken out (a head records its base model's
    absolute path); a file of measured times: only its presence; any other file's SHA-256."""
    if path.suffix == ".json":
        return _normalise(json.loads(path.read_text()), store)
    if path.name in MEASURED_FILES:
        return "measured"
    return sha256


def describe_store(store: Path) -> dict[str, Any]:
    """A comparable description of every final artifact: its manifest (minus time, package version
    and the store path; shards and files by name), every table's rows (minus the run id), every
    file's SHA-256 (JSON files: their content, minus the store path)."""
    import pyarrow.parquet as pq

    out: dict[str, Any] = {}
    for stage, dirs in final_artifacts(store).items():
        for path in dirs:
            raw = json.loads((path / MANIFEST).read_text())
            rows = {
                name: _normalise(
                    [r for s in shards for r in pq.read_table(path / s["path"]).to_pylist()], store
                )
                for name, shards in raw["tables"].items()
            }
            files = {f["path"]: _file_content(path / f["path"], f["sha256"], store) for f in raw["files"]}
            # a table shard's checksum changes with a run id in its rows: compared row by row instead
            raw["tables"] = {
                n: [(s["path"], s["rows"]) for s in shards] for n, shards in raw["tables"].items()
            }
            raw["files"] = sorted(files)
            manifest = {k: v for k, v in raw.items() if k not in {"created_at", "package_version"}}
            out[f"{stage}/{path.name}"] = {
                "manifest": _normalise(manifest, store),
                "rows": rows,
                "files": files,
            }
    return out


def subflow_names(state) -> list[str]:
    """The flows of the sub-flow runs the flow run that ended in `state` started, sorted."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    parent = FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        return sorted(client.read_flow(run.flow_id).name for run in runs)
