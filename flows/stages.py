"""Stage-only flows: the reference pass, training, and the α-sweep with evaluation, each on its own.

Each flow takes the store keys of its inputs (as `alignheads run` prints them, or as the
`store/<stage>/<key>/` directory names show them) plus the typed config sections it needs,
checks that those artifacts are complete in the store, and runs the same cached tasks as
the pipeline flow (so an artifact the pipeline built is reused, and the other way round).

A model left empty (`model.name_or_path`) is the tiny world's, found by following the
input artifacts' manifests back to the world that produced their data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alignheads.config import (
    EvaluateConfig,
    ModelConfig,
    RefPassConfig,
    RunConfig,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
)
from alignheads.flows.failures import user_errors_fail_in_one_line
from alignheads.flows.mapped import reference_pass
from alignheads.flows.pipeline import method_plans, sweep_and_report, train_methods
from alignheads.flows.tracking import logged, tracked
from alignheads.loading import library_progress_bars_off, load_tokenizer, model_location
from alignheads.storage.artifacts import artifact_dir
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.manifest import MANIFEST, Manifest, read_manifest
from alignheads.storage.tracking import flatten
from alignheads.tasks import refpass as refpass_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks.cached import RunOutcome, StageResult
from alignheads.tasks.ingest import check_sources

# The chain of inputs a manifest may name, nearest first (to find the world behind an artifact).
_UPSTREAM = ("train", "refpass", "tokenize", "data", "world")


class MissingArtifactError(FileNotFoundError):
    """A stage flow's input key names no complete artifact in the store."""


def complete_input(store: Path, stage: str, key: str, parameter: str) -> Manifest:
    """The manifest of the complete `stage` artifact `key`, checked cheaply (manifest present and
    for this stage, every listed shard and file on disk); raises MissingArtifactError naming the
    parameter and the key otherwise."""
    path = artifact_dir(store, stage, key)
    if not key or not (path / MANIFEST).is_file():
        raise MissingArtifactError(
            f"{parameter}={key!r}: no complete {stage} artifact in the store ({path} has no "
            f"{MANIFEST}); run the pipeline or the stage that builds it first"
        )
    manifest = read_manifest(path, stage)
    listed = [s.path for shards in manifest.tables.values() for s in shards] + [
        f.path for f in manifest.files
    ]
    missing = [rel for rel in listed if not (path / rel).is_file()]
    if missing:
        raise MissingArtifactError(
            f"{parameter}={key!r}: the {stage} artifact {path} lacks files its manifest lists: {missing[:5]}"
        )
    return manifest


def world_dir_behind(store: Path, manifest: Manifest) -> Path | None:
    """The world artifact an artifact's data came from (following its inputs), or None."""
    while "world" not in manifest.inputs:
        parent = next((s for s in _UPSTREAM if s in manifest.inputs), None)
        if parent is None:
            return None
        manifest = read_manifest(artifact_dir(store, parent, manifest.inputs[parent]), parent)
    return artifact_dir(store, "world", manifest.inputs["world"])


def model_source(store: Path, model: ModelConfig, manifest: Manifest) -> dict[str, Any]:
    """Where the run's model is (name_or_path, revision, trust_remote_code, dtype), as the
    pipeline passes it to training and generation."""
    world = world_dir_behind(store, manifest) if model.name_or_path is None else None
    path, revision = model_location(model, world)
    return {
        "name_or_path": path,
        "revision": revision,
        "trust_remote_code": model.trust_remote_code,
        "dtype": model.dtype,
    }


@flow(name="alignheads-refpass", log_prints=True)
@user_errors_fail_in_one_line
def refpass_flow(
    tokenize_key: str,
    store: Path = Path("store"),
    model: ModelConfig = ModelConfig(),  # noqa: B008 (the UI form's default)
    refpass: RefPassConfig = RefPassConfig(),  # noqa: B008
) -> RunOutcome:
    """The reference pass over a tokenize artifact (mapped over shards, then finalized).

    Args:
        tokenize_key: Key of the complete tokenize artifact in the store (store/tokenize/KEY)
        store: Directory holding every artifact, table and the MLflow DB
        model: The model whose log-probs are cached; empty name_or_path uses the tiny world's
        refpass: Reference-pass settings (top-k, storage dtype, shards, task runner)
    """
    cfg = RunConfig(store=store, model=model, refpass=refpass).resolved()
    tokenize = complete_input(cfg.store, "tokenize", tokenize_key, "tokenize_key")
    source = model_source(cfg.store, model, tokenize)
    tok_fp = tokenizer_fingerprint(
        load_tokenizer(source["name_or_path"], source["revision"], model.trust_remote_code)
    )
    if tok_fp != tokenize.inputs["tokenizer"]:
        raise ValueError(
            f"tokenize_key={tokenize_key!r} was tokenized with another tokenizer than the one of "
            f"model {source['name_or_path']}; run the refpass with the model the data was tokenized for"
        )
    tokenize_path = artifact_dir(cfg.store, "tokenize", tokenize_key)
    plan = refpass_stage.plan_refpass(refpass, model, source["name_or_path"], tokenize_path, tok_fp)
    with library_progress_bars_off():
        outcome = RunOutcome(refpass=reference_pass(cfg, plan))
    return logged(outcome, get_run_logger().info)


@flow(name="alignheads-train", log_prints=True)
@user_errors_fail_in_one_line
def train_flow(
    refpass_key: str,
    store: Path = Path("store"),
    name: str = "tiny",
    model: ModelConfig = ModelConfig(),  # noqa: B008
    train: TrainConfig = TrainConfig(),  # noqa: B008
    tracking: TrackingConfig = TrackingConfig(),  # noqa: B008
) -> RunOutcome:
    """Train the enabled methods (heads and baselines) over a reference cache, each in an MLflow
    child run.

    Args:
        refpass_key: Key of the complete refpass artifact in the store (store/refpass/KEY)
        store: Directory holding every artifact, table and the MLflow DB
        name: Run name; also the MLflow experiment name
        model: The frozen model the heads steer; empty name_or_path uses the tiny world's
        train: Every method's training settings (enabled = false leaves one out)
        tracking: MLflow tracking of this flow run (parent run) and each method (child runs)
    """
    cfg = RunConfig(name=name, store=store, model=model, train=train, tracking=tracking).resolved()
    refpass = complete_input(cfg.store, "refpass", refpass_key, "refpass_key")
    source = model_source(cfg.store, model, refpass)
    refpass_path = artifact_dir(cfg.store, "refpass", refpass_key)
    params = {"refpass_key": refpass_key, "model": model.model_dump(mode="json"), "train": train}
    outcome = RunOutcome()
    with tracked(cfg, flatten(params), "stage") as run, library_progress_bars_off():
        train_methods(cfg.store, method_plans(train, refpass_path, source), run, outcome)
        run.finish(outcome)
    return logged(outcome.model_copy(update={"mlflow_run": run.run_id}), get_run_logger().info)


def trained_plan(store: Path, manifest: Manifest, source: dict[str, Any]) -> train_stage.TrainPlan:
    """The TrainPlan that built a train artifact, rebuilt from its manifest (key checked)."""
    entry, settings = train_stage.trained_settings(artifact_dir(store, manifest.stage, manifest.key))
    refpass = artifact_dir(store, "refpass", manifest.inputs["refpass"])
    plan = train_stage.plan_train(entry.name, settings, refpass, source)
    if plan.key != manifest.key:
        raise ValueError(f"{manifest.stage} artifact {manifest.key}: its manifest does not reproduce its key")
    return plan


@flow(name="alignheads-sweep", log_prints=True)
@user_errors_fail_in_one_line
def sweep_flow(
    train_keys: list[str],
    data_key: str,
    store: Path = Path("store"),
    name: str = "tiny",
    model: ModelConfig = ModelConfig(),  # noqa: B008
    sweep: SweepConfig = SweepConfig(),  # noqa: B008
    evaluate: EvaluateConfig = EvaluateConfig(),  # noqa: B008
    tracking: TrackingConfig = TrackingConfig(),  # noqa: B008
) -> RunOutcome:
    """α-sweep generation per trained method and α, then evaluation and the report.

    Args:
        train_keys: Keys of complete train artifacts (store/train/KEY) of any method (heads,
            GenARM, DPO + DeRa), at most one per method
        data_key: Key of the data artifact whose test prompts are generated from (store/data/KEY)
        store: Directory holding every artifact, table and the MLflow DB
        name: Run name; also the MLflow experiment name
        model: The frozen model the heads steer; empty name_or_path uses the tiny world's
        sweep: Which α, which prompts, how to decode
        evaluate: How the generations are scored
        tracking: MLflow tracking of this flow run (parent run) and each (method, α) (child runs)
    """
    if not train_keys:
        raise ValueError("train_keys is empty: give at least one train artifact key")
    cfg = RunConfig(
        name=name, store=store, model=model, sweep=sweep, evaluate=evaluate, tracking=tracking
    ).resolved()
    check_sources(cfg)  # the sweep's prompts file
    complete_input(cfg.store, "data", data_key, "data_key")
    data_path = artifact_dir(cfg.store, "data", data_key)
    outcome = RunOutcome()
    plans: dict[str, train_stage.TrainPlan] = {}
    for i, key in enumerate(train_keys):
        manifest = complete_input(cfg.store, "train", key, f"train_keys[{i}]")
        source = model_source(cfg.store, model, manifest)
        plan = trained_plan(cfg.store, manifest, source)
        if plan.kind in plans:
            raise ValueError(
                f"train_keys: two {plan.kind} artifacts ({plans[plan.kind].key}, {key}); give one per method"
            )
        plans[plan.kind] = plan
        path = artifact_dir(cfg.store, "train", key)
        outcome.train[plan.kind] = StageResult(
            stage="train", key=key, path=str(path), computed=False, info=manifest.info, status="reused"
        )
    params = {"train_keys": train_keys, "data_key": data_key, "sweep": sweep, "evaluate": evaluate}
    with tracked(cfg, flatten(params), "stage") as run, library_progress_bars_off():
        sweep_and_report(cfg, plans, data_path, source, run, outcome)
        run.finish(outcome)
    return logged(outcome.model_copy(update={"mlflow_run": run.run_id}), get_run_logger().info)
