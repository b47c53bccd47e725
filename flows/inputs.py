"""What every reference cache of a run shares, and the stages that build one: the tiny world
(when the run uses it), the model and tokenizer, then data ─> tokenize ─> reference pass for one
set of preference pairs (the run's own, or a dial's), and training one method over such a cache
in its MLflow child run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from alignheads.config import DataConfig, RunConfig
from alignheads.flows.mapped import reference_pass
from alignheads.flows.tracking import RunTracking
from alignheads.loading import load_tokenizer, model_location
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.tokenizer_memo import memoized_fingerprint
from alignheads.tasks import data as data_stage
from alignheads.tasks import refpass as refpass_stage
from alignheads.tasks import tokenize as tokenize_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks import world as world_stage
from alignheads.tasks.cached import RunOutcome, StageResult, run_stage


@dataclass(frozen=True)
class RunInputs:
    """What every reference cache of a run shares: the world (when used), the model and tokenizer."""

    world_dir: Path | None
    world_key: str | None
    model_path: str
    tokenizer_source: dict[str, Any]
    tokenizer_fp: str
    dtype: str

    @property
    def model_source(self) -> dict[str, Any]:
        """What train, calibrate and generate load: the tokenizer's source plus the model dtype."""
        return self.tokenizer_source | {"dtype": self.dtype}


def run_inputs(cfg: RunConfig, outcome: RunOutcome) -> RunInputs:
    """Build (or reuse) the tiny world when the run uses it (recorded in `outcome.world`), and
    resolve the run's model and tokenizer."""
    world_dir = None
    if cfg.needs_world:
        if not cfg.world.build:
            raise ValueError("model or data come from the tiny world, but world.build is false")
        key = world_stage.world_key(cfg.world)
        outcome.world = run_stage(world_stage.world_task, cfg.store, key=key, world=cfg.world)
        world_dir = outcome.world.directory
    model_path, revision = model_location(cfg.model, world_dir)
    tokenizer_source = {
        "name_or_path": model_path,
        "revision": revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    return RunInputs(
        world_dir=world_dir,
        world_key=outcome.world.key if outcome.world is not None else None,
        model_path=model_path,
        tokenizer_source=tokenizer_source,
        # from the store's memo when the tokenizer's files are unchanged: a cached re-run loads no
        # tokenizer (nor transformers) only to hash it again
        tokenizer_fp=memoized_fingerprint(
            cfg.store, tokenizer_source, lambda: tokenizer_fingerprint(load_tokenizer(**tokenizer_source))
        ),
        dtype=cfg.model.dtype,
    )


def reference_cache(
    cfg: RunConfig, data: DataConfig, inputs: RunInputs, objective: str | None = None
) -> tuple[StageResult, StageResult, StageResult]:
    """The data, tokenize and reference-pass stages of one set of preference pairs (`data`, with
    the world's pairs of `objective` where it is empty: a dial's), cached; returns their results."""
    store = cfg.store
    dplan = data_stage.plan_data(data, inputs.world_dir, inputs.world_key, inputs.tokenizer_fp, objective)
    data_result = run_stage(
        data_stage.data_task, store, key=dplan.key, plan=asdict(dplan), tokenizer_source=inputs.tokenizer_source
    )
    where = f" ({objective} pairs)" if objective else ""
    rejected = sum(data_result.info.get("rejects", {}).values())
    if rejected:
        get_run_logger().warning("%d bad rows skipped and recorded in the rejects table%s", rejected, where)
    overlap = data_result.info.get("overlap", {})
    if overlap.get("test_pairs_with_train_prompt"):
        get_run_logger().warning(
            "%d held-out pairs%s repeat a training prompt word for word (%s; data.train_overlap: %s)",
            overlap["test_pairs_with_train_prompt"],
            where,
            f"{overlap['dropped']} dropped" if overlap["dropped"] else "kept",
            overlap["policy"],
        )

    tplan = tokenize_stage.plan_tokenize(cfg.tokenize, data_result.key, data_result.path, inputs.tokenizer_fp)
    tokenized = run_stage(
        tokenize_stage.tokenize_task,
        store,
        key=tplan.key,
        plan=asdict(tplan),
        tokenizer_source=inputs.tokenizer_source,
    )
    rplan = refpass_stage.plan_refpass(cfg.refpass, cfg.model, inputs.model_path, tokenized.path, inputs.tokenizer_fp)
    return data_result, tokenized, reference_pass(cfg, rplan)


def train_one(store: Path, plan: train_stage.TrainPlan, run: RunTracking) -> StageResult:
    """The cached train stage of `plan` in an MLflow child run named `train-<plan.run_label>`
    (opened only when it is trained now; a reused training names the run that holds it)."""
    with run.child_training(plan) as child:
        result = run_stage(train_stage.train_task, store, key=plan.key, plan=asdict(plan), tracking=child.tracking)
        run.trained(child, plan, result)
    return result
