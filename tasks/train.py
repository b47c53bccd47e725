"""Train stage: one method (any entry of alignheads.models.methods) trained over the reference cache.

The artifact `<store>/train/<key>/` holds the trained result under the method's `saved_as`
subdirectory — `head/` (head_config.json + head_model.safetensors) for IAV and CALM, `model/`
(a plain transformers checkpoint, safetensors) for GenARM and DPO — and the `train_metrics`
table (one row per optimizer step and evaluation). Resumable checkpoints live outside it, in
`<store>/checkpoints/train/<key>/`, so a killed run continues from its last checkpoint (the
artifact itself only appears once training has finished).

Key = hash(method name + training settings, the reference cache's key (which covers the model,
tokenizer and data, and the run's model when the reference is another), format version). IAV's
`base_head: auto` is resolved before hashing, from the reference cache's config: 'frozen' when
the reference is the run's own model, 'trained' when it is another model, so the setting that
decides whether W_b trains is in the key.

`features: cached` reads the hidden states the reference pass stored. With the default
`refpass.hidden_dtype: float32` they are exactly the states the cached reference values come
from: cached and backbone features are the same training (a fresh head starts at ``ln 2`` and
scores 0.5 at α = 0 either way). A float16 cache holds those states rounded: a fresh head then
starts ~1e-4 off the reference (a warning says so).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import task

from alignheads.config import ConfigError, IAVTrainConfig, PreferenceTrainConfig
from alignheads.models.methods import Method, method
from alignheads.storage.artifacts import ArtifactContent, ArtifactResult, ensure_artifact
from alignheads.storage.fingerprint import artifact_key
from alignheads.storage.manifest import read_manifest
from alignheads.storage.tables import write_table
from alignheads.tasks.cached import StageResult, task_options

log = logging.getLogger(__name__)

STAGE = "train"
# 2: one train stage for every method (the baselines' artifacts were a stage of their own)
# 3: logits soft-capped like the model's forward; IAV's W_b frozen when the reference is the run's
#    own model; baselines fine-tuned without dropout
# 4: head losses chunked over scored tokens, `kl: topk` with the tail extrapolated from the top k,
#    fused AdamW (training numbers move by float rounding; a trained W_b by the estimator)
TRAIN_VERSION = 4


@dataclass(frozen=True)
class TrainPlan:
    """One method's training inputs, resolved, with the artifact key they hash to (JSON-able)."""

    key: str
    kind: str  # the method's name
    train: dict
    refpass_path: str
    tokenize_path: str
    model: dict
    config: dict
    inputs: dict[str, str]
    # what MLflow names its runs and registered model after: the method's name, or `dial-<name>`
    # for a dial (not part of the key: a dial trains like any head of its method)
    label: str = ""
    # IAV's `kl: exact` against another reference model: that model (name_or_path, revision, dtype,
    # trust_remote_code), whose output layer the training loads; None otherwise. Not in the key:
    # the reference cache's key covers the reference model
    kl_reference: dict[str, Any] | None = None

    @property
    def method(self) -> Method:
        return method(self.kind)

    @property
    def run_label(self) -> str:
        return self.label or self.kind

    @property
    def settings(self) -> PreferenceTrainConfig:
        return self.method.settings.model_validate(self.train)

    def saved_in(self, artifact: str | Path) -> Path:
        """Where a complete artifact of this plan holds the trained result."""
        return Path(artifact) / self.method.saved_as


def plan_train(
    kind: str, cfg: PreferenceTrainConfig, refpass_path: str | Path, model: dict[str, Any], label: str = ""
) -> TrainPlan:
    """The plan of training method `kind` with settings `cfg` over the reference cache at
    `refpass_path`. `model`: name_or_path, revision, dtype, trust_remote_code of the run's model;
    `label`: the MLflow name of a dial's training (`dial-<name>`), empty for the method's own."""
    entry = method(kind)
    refpass = read_manifest(Path(refpass_path), "refpass")
    if getattr(cfg, "features", None) == "cached" and not refpass.config.get("store_hidden"):
        raise ConfigError(
            f"train.{entry.section}.features is 'cached' but the reference cache {refpass_path} holds no "
            "hidden states: set refpass.store_hidden: true"
        )
    if getattr(cfg, "features", None) == "cached" and not refpass.config.get("model", {}).get("own", True):
        # the cached states are the reference's backbone's, while the head steers the run model's
        # at decoding time: training on them would fit a head to another model's features
        raise ConfigError(
            f"train.{entry.section}.features is 'cached' but the reference cache {refpass_path} scores "
            "another reference model (refpass.reference_model), so its hidden states are that model's, "
            "not the run model's: use features: backbone"
        )
    if getattr(cfg, "features", None) == "cached" and refpass.config.get("hidden_dtype") == "float16":
        log.warning(
            "train.%s.features is 'cached' over float16 hidden states: the head trains on rounded "
            "states while the cached reference comes from the full-precision ones (a fresh head starts "
            "~1e-4 off the reference); refpass.hidden_dtype: float32 makes it the backbone's training",
            entry.section,
        )
    if getattr(cfg, "kl", None) == "sampled" and not refpass.config.get("tail_draws"):
        raise ConfigError(
            f"train.{entry.section}.kl is 'sampled' but the reference cache {refpass_path} holds no tail "
            "draws: set refpass.tail_draws (e.g. 16)"
        )
    cfg = resolve_base_head(cfg, refpass.config)
    kl_reference = kl_reference_model(cfg, refpass, refpass_path, model, entry.section)
    config = {"kind": kind, **cfg.model_dump(mode="json", exclude=entry.key_excludes(cfg))}
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
        label=label,
        kl_reference=kl_reference,
    )


def resolve_base_head(cfg: PreferenceTrainConfig, refpass_config: dict[str, Any]) -> PreferenceTrainConfig:
    """IAV's settings with `base_head: auto` resolved from the reference cache's config: 'frozen'
    when the reference is the run's own model (W_b's optimum is the model's lm_head itself, its
    only gradient rounding noise), 'trained' when `refpass.reference_model` named another model.
    Other methods: unchanged."""
    if not isinstance(cfg, IAVTrainConfig):
        return cfg
    if cfg.base_head == "auto":
        cfg = cfg.model_copy(
            update={"base_head": "frozen" if _scores_own_model(refpass_config) else "trained"}
        )
    return cfg


def _scores_own_model(refpass_config: dict[str, Any]) -> bool:
    """Whether a reference cache scored the run's own model (caches before format 3 do not say;
    theirs was the run's own model unless reference_model was set)."""
    return refpass_config.get("model", {}).get("own", True)


def kl_reference_model(
    cfg: PreferenceTrainConfig, refpass: Any, refpass_path: Any, model: dict[str, Any], section: str
) -> dict[str, Any] | None:
    """The reference model whose output layer IAV's `kl: exact` reads when the cache (its manifest
    `refpass`, at `refpass_path`) scores another model than the run's: name_or_path, revision,
    dtype and trust_remote_code (the run model's setting); None for any other training. Raises
    ConfigError when the cache holds none of that model's hidden states (the KL is its lm_head of
    them), or when the two models' output layers do not cover the same vocabulary."""
    if not isinstance(cfg, IAVTrainConfig) or cfg.kl != "exact" or _scores_own_model(refpass.config):
        return None
    if not refpass.config.get("store_hidden"):
        raise ConfigError(
            f"train.{section}.kl is 'exact' but the reference cache {refpass_path} scores another "
            "reference model and holds none of its hidden states, which the exact KL to it reads: set "
            "refpass.store_hidden: true, or use kl: topk"
        )
    from alignheads.loading import model_shape

    trust = bool(model.get("trust_remote_code", False))
    run_vocab, _ = model_shape(str(model["name_or_path"]), model.get("revision"), trust)
    if int(refpass.info["vocab_size"]) != run_vocab:
        raise ConfigError(
            f"train.{section}.kl is 'exact' against the reference model {refpass.info['model']}, whose "
            f"output layer has {refpass.info['vocab_size']} rows against the run model's {run_vocab}: "
            "the two distributions are not over the same tokens; use kl: topk"
        )
    return {
        "name_or_path": str(refpass.info["model"]),
        "revision": refpass.info.get("revision"),
        "dtype": refpass.config.get("model_dtype", "float32"),
        "trust_remote_code": trust,
    }


def load_kl_reference(source: dict[str, Any]):
    """A plan's `kl_reference` as the trainee takes it: the model's output layer alone (the rest of
    it is never materialised: 0.5 GB of a 7B model, not 13) and its final-logit soft-cap."""
    from alignheads.loading import load_output_layer_only
    from alignheads.models.head_base import final_logit_cap, lm_output_layer
    from alignheads.models.trainees import KLReference

    reference = load_output_layer_only(
        source["name_or_path"], source.get("revision"), source["dtype"], source["trust_remote_code"]
    )
    layer = lm_output_layer(reference).requires_grad_(False)
    return KLReference(layer=layer, cap=final_logit_cap(reference))


def trained_settings(artifact: str | Path) -> tuple[Method, PreferenceTrainConfig]:
    """The method and settings a complete train artifact was trained with, from its manifest
    (settings that do not change the result are back at their defaults)."""
    config = dict(read_manifest(Path(artifact), STAGE).config)
    entry = method(config.pop("kind"))
    return entry, entry.settings.model_validate(config)


def trained_base(artifact: str | Path) -> tuple[str, str | None]:
    """(name_or_path, revision) of the model a complete train artifact was trained on, from the
    manifest of the reference cache it was trained over (in the same store): the run's own model
    when it was the reference. Raises ValueError when the cache scored another reference model
    and names the run's model by its weights only (a local directory): then give the base."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact, STAGE)
    refpass = read_manifest(artifact.parent.parent / "refpass" / manifest.inputs["refpass"], "refpass")
    identity = refpass.config.get("model", {})
    if identity.get("own", True):
        return str(refpass.info["model"]), refpass.info.get("revision")
    run_model = identity.get("run_model") or {}
    if run_model.get("kind") == "hub":
        return str(run_model["id"]), run_model.get("revision")
    raise ValueError(
        f"{artifact}: trained over the cache of another reference model; its run model is a local "
        "directory the cache names by its weights only: pass the base model (--base DIR)"
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


def load_run_model(source: dict[str, Any], load=None):
    """(model, tokenizer, pad id) of the run's model as `source` names it (not moved to a device),
    loaded by ``load(name_or_path, revision, dtype, trust_remote_code)``: `loading.load_causal_lm`
    (the default), or `loading.load_output_layer_only` where only the output layer is read."""
    from alignheads.loading import load_causal_lm, load_tokenizer

    where = (source["name_or_path"], source.get("revision"))
    trust = source.get("trust_remote_code", False)
    model = (load or load_causal_lm)(*where, source.get("dtype", "float32"), trust)
    tokenizer = load_tokenizer(*where, trust)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, pad_id


def pair_streams(plan: TrainPlan):
    """(train, test) PairStreams over the plan's reference cache, reading what its method needs."""
    from alignheads.tasks.training.batches import PairStream

    needs, _ = plan.method.batches(plan.settings, reference_hidden=plan.kl_reference is not None)
    refpass, tokenized = Path(plan.refpass_path), Path(plan.tokenize_path)
    return PairStream(refpass, tokenized, "train", needs), PairStream(refpass, tokenized, "test", needs)


def make_job(plan: TrainPlan, checkpoints: Path, log=None, progress: bool = True):
    """The TrainJob of a plan: the run's model loaded, train/test streams over the cache."""
    from alignheads.loading import load_output_layer_only
    from alignheads.tasks.training.loop import TrainJob

    # a head on the cache's hidden states reads only the LM's output layer: leave the rest unloaded
    cached = getattr(plan.settings, "features", None) == "cached"
    model, _, pad_id = load_run_model(plan.model, load_output_layer_only if cached else None)
    train, test = pair_streams(plan)
    return TrainJob(
        method=plan.method,
        cfg=plan.settings,
        model=model,
        train=train,
        eval=test,
        checkpoint_dir=checkpoints,
        pad_id=pad_id,
        log=log or (lambda metrics, step: None),
        progress=progress,
        kl_reference=load_kl_reference(plan.kl_reference) if plan.kl_reference is not None else None,
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


def save_trained(plan: TrainPlan, job, result, out: Path) -> None:
    """Write the trained result where the artifact holds it (`out/<saved_as>`)."""
    training = {"config": plan.train, "steps": result.steps}
    plan.method.save(result.trainee, out / plan.method.saved_as, job.model, training)


def _train_in_process(store: Path, plan: TrainPlan, out: Path, log, progress: bool) -> dict[str, Any]:
    from alignheads.tasks.training.loop import train

    job = make_job(plan, checkpoint_dir(store, plan.key), log, progress)
    result = train(job)
    save_trained(plan, job, result, out)
    return result_summary(result)


def _train_launched(store: Path, plan: TrainPlan, out: Path, log) -> dict[str, Any]:
    """Run `accelerate launch` over num_processes processes; replay the metrics into `log` after."""
    work = out / ".launch"
    work.mkdir()
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    cmd = launch_command(plan_file, work, checkpoint_dir(store, plan.key), plan.settings.num_processes)
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    result = json.loads((work / "result.json").read_text())
    shutil.move(str(work / plan.method.saved_as), str(out / plan.method.saved_as))
    shutil.rmtree(work)
    if log is not None:
        for row in result["history"]:
            log({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
    return result


def run_train(store: Path, plan: TrainPlan, log=None, progress: bool = True) -> ArtifactResult:
    """Train the method (resuming from a checkpoint when one exists) unless the artifact is complete."""
    processes = plan.settings.num_processes

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


def metric_logger(tracking: dict[str, str] | None):
    """A training loop's `log(metrics, step)` into the MLflow run `tracking` names, or None."""
    if tracking is None:
        return None
    from alignheads.storage.tracking import Tracker

    tracker, run_id = Tracker(tracking["uri"], tracking["experiment_id"]), tracking["run_id"]

    def log(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics(run_id, metrics, step)

    return log


@task(**task_options(STAGE, run_name="train-{plan[kind]}"))
def train_task(store: str, key: str, plan: dict[str, Any], tracking: dict[str, str] | None) -> StageResult:
    """The train stage as a cached Prefect task; metrics go to the MLflow run `tracking` names."""
    return StageResult.of(run_train(Path(store), TrainPlan(**plan), log=metric_logger(tracking)))
