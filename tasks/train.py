"""Train stage: one head (IAV or CALM) trained over the reference cache, saved as a head directory.

The artifact `<store>/train/<key>/` holds `head/` (head_config.json + head_model.safetensors)
and the `train_metrics` table (one row per optimizer step and evaluation). Resumable
checkpoints live outside it, in `<store>/checkpoints/train/<key>/`, so a killed run continues
from its last checkpoint (the artifact itself only appears once training has finished).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignheads.config import CALMTrainConfig, HeadTrainConfig, IAVTrainConfig
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table

STAGE = "train"
TRAIN_VERSION = 1
HEAD_SUBDIR = "head"
# settings that change how a run is watched, not what it computes
_NOT_IN_KEY = {"enabled", "resume", "eval_every", "checkpoint_every", "num_processes"}
CONFIG_CLASSES: dict[str, type[HeadTrainConfig]] = {"iav": IAVTrainConfig, "calm": CALMTrainConfig}


@dataclass(frozen=True)
class TrainPlan:
    """One head's training inputs, resolved, with the artifact key they hash to (JSON-able)."""

    key: str
    kind: str
    train: dict
    refpass_path: str
    tokenize_path: str
    model: dict
    config: dict
    inputs: dict[str, str]

    @property
    def head_config(self) -> HeadTrainConfig:
        return CONFIG_CLASSES[self.kind].model_validate(self.train)


def plan_train(kind: str, cfg: HeadTrainConfig, refpass_path: str | Path, model: dict[str, Any]) -> TrainPlan:
    """Key = hash(head kind + training settings, the reference cache's key (which covers the
    model, tokenizer and data), format version). `model`: name_or_path, revision, dtype,
    trust_remote_code of the run's model."""
    refpass = read_manifest(Path(refpass_path), "refpass")
    if cfg.features == "cached" and not refpass.config.get("store_hidden"):
        raise ValueError(
            f"train.{kind}.features is 'cached' but the reference cache {refpass_path} holds no hidden "
            "states: set refpass.store_hidden: true"
        )
    config = {"kind": kind, **cfg.model_dump(mode="json", exclude=_NOT_IN_KEY)}
    inputs = {"refpass": refpass.key}
    tokenize_path = Path(refpass_path).parent.parent / "tokenize" / refpass.inputs["tokenize"]
    return TrainPlan(
        key=artifact_key(STAGE, config, inputs, TRAIN_VERSION),
        kind=kind,
        train=cfg.model_dump(mode="json"),
        refpass_path=str(refpass_path),
        tokenize_path=str(tokenize_path),
        model=dict(model),
        config=config,
        inputs=inputs,
    )


def checkpoint_dir(store: Path, key: str) -> Path:
    return Path(store) / "checkpoints" / STAGE / key


def metrics_table(history: list[dict[str, float]]) -> pa.Table:
    """Long format (step, name, value): training and evaluation metrics share one table."""
    steps, names, values = [], [], []
    for row in history:
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                steps.append(step)
                names.append(name)
                values.append(float(value))
    return pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "name": pa.array(names, pa.string()),
            "value": pa.array(values, pa.float64()),
        }
    )


def launch_command(plan_file: Path, out_dir: Path, checkpoints: Path, processes: int) -> list[str]:
    """`accelerate launch` of the training entry point. `--multi_gpu` is accelerate's
    multi-process launcher (torchrun); on a CPU-only machine the processes use gloo."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", "0", "-m", "alignheads.tasks.training.launch",
        str(plan_file), str(out_dir), "--checkpoints", str(checkpoints),
    ]  # fmt: skip


def make_job(plan: TrainPlan, checkpoints: Path, log=None, progress: bool = True):
    """The TrainJob of a plan: the frozen model loaded, train/test streams over the cache."""
    from alignheads.loading import load_causal_lm, load_tokenizer
    from alignheads.tasks.training.batches import PairStream
    from alignheads.tasks.training.loop import TrainJob, batch_needs

    cfg, m = plan.head_config, plan.model
    source = (m["name_or_path"], m.get("revision"))
    model = load_causal_lm(*source, m.get("dtype", "float32"), m.get("trust_remote_code", False))
    tokenizer = load_tokenizer(*source, m.get("trust_remote_code", False))
    needs = batch_needs(plan.kind, cfg)
    refpass, tokenized = Path(plan.refpass_path), Path(plan.tokenize_path)
    return TrainJob(
        kind=plan.kind,
        cfg=cfg,
        model=model,
        train=PairStream(refpass, tokenized, "train", needs),
        eval=PairStream(refpass, tokenized, "test", needs),
        checkpoint_dir=checkpoints,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        log=log or (lambda metrics, step: None),
        progress=progress,
    )


def result_summary(result) -> dict[str, Any]:
    """A TrainResult's JSON-able part."""
    return {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_metrics": result.final_metrics,
        "eval_metrics": result.eval_metrics,
        "history": result.history,
    }


def _train_in_process(store: Path, plan: TrainPlan, out: Path, log, progress: bool) -> dict[str, Any]:
    from alignheads.models.head_io import save_head
    from alignheads.tasks.training.loop import train_head

    job = make_job(plan, checkpoint_dir(store, plan.key), log, progress)
    result = train_head(job)
    save_head(
        result.head,
        out / HEAD_SUBDIR,
        base_model=job.model,
        training={"config": plan.train, "steps": result.steps},
    )
    return result_summary(result)


def _train_launched(store: Path, plan: TrainPlan, out: Path, log) -> dict[str, Any]:
    """Run `accelerate launch` over num_processes processes; replay the metrics into `log` after."""
    work = out / ".launch"
    work.mkdir()
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    cmd = launch_command(plan_file, work, checkpoint_dir(store, plan.key), plan.head_config.num_processes)
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    result = json.loads((work / "result.json").read_text())
    shutil.move(str(work / "head"), str(out / HEAD_SUBDIR))
    shutil.rmtree(work)
    if log is not None:
        for row in result["history"]:
            log({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
    return result


def run_train(store: Path, plan: TrainPlan, log=None, progress: bool = True) -> ArtifactResult:
    """Train the head (resuming from a checkpoint when one exists) unless the artifact is complete."""
    processes = plan.head_config.num_processes

    def build(staging: Path) -> ArtifactContent:
        if processes > 1:
            result = _train_launched(store, plan, staging, log)
        else:
            result = _train_in_process(store, plan, staging, log, progress)
        history = result["history"]
        if result["eval_metrics"]:
            history = history + [result["eval_metrics"] | {"step": float(result["steps"])}]
        info = {
            "kind": plan.kind,
            "steps": result["steps"],
            "resumed_from": result["resumed_from"],
            "final": result["final_metrics"],
            "eval": result["eval_metrics"],
            "processes": processes,
        }
        table = write_table(metrics_table(history), staging, "train_metrics")
        return ArtifactContent(tables={"train_metrics": table}, info=info)

    return ensure_artifact(store, STAGE, plan.key, TRAIN_VERSION, plan.config, plan.inputs, build)


def preference_accuracy_by_alpha(plan: TrainPlan, head_dir: Path, alphas: list[float]) -> dict[str, float]:
    """Held-out preference accuracy of the implicit reward of a trained head at each α
    (keys are `str(float(α))`); at α = 0 CALM is the reference itself, so its margins are 0."""
    from alignheads.models.head_base import lm_output_layer
    from alignheads.models.head_io import load_head
    from alignheads.tasks.training.loop import evaluate, features_fn

    cfg = plan.head_config
    job = make_job(plan, Path(head_dir), progress=False)
    head = load_head(head_dir, job.model).eval()
    frozen = lm_output_layer(job.model)
    features = features_fn(cfg, job.model.base_model, head.needs_token_context, frozen.weight.dtype)
    out = {}
    for alpha in alphas:
        metrics = evaluate(
            head,
            frozen,
            job.eval,
            features,
            cfg.features == "backbone",
            job.pad_id,
            cfg.beta,
            cfg.batch_size,
            alpha,
        )
        out[str(float(alpha))] = metrics.get("eval/rewards/accuracies", float("nan"))
    return out
