"""The pipeline flow: the DAG of cached stage tasks, and the compositions the stage flows share.

    world ─┐ (embedded default only)
    data ──┴─> tokenize ─> reference pass (mapped over shards) ─> train (every enabled method)
              ─> α calibration to target KLs (mapped over methods)
              ─> α-sweep generation (mapped over methods, all α batched) ─> evaluate ─> report

Each stage's task, plan and cache key live in its module under `alignheads.tasks`; this module
only wires them together (and `flows.tracking` logs what they did).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from alignheads.config import RunConfig, SweepConfig, TrainConfig, read_config, with_overrides
from alignheads.flows.failures import user_errors_fail_in_one_line
from alignheads.flows.mapped import calibrations, generations, reference_pass
from alignheads.flows.tracking import RunTracking, logged, tracked
from alignheads.loading import library_progress_bars_off, load_tokenizer, model_location
from alignheads.models.methods import enabled_methods
from alignheads.storage.fingerprint import tokenizer_fingerprint
from alignheads.storage.store_errors import writing
from alignheads.storage.tracking import flatten
from alignheads.tasks import calibrate as calibrate_stage
from alignheads.tasks import data as data_stage
from alignheads.tasks import evaluate as evaluate_stage
from alignheads.tasks import generate as generate_stage
from alignheads.tasks import refpass as refpass_stage
from alignheads.tasks import report as report_stage
from alignheads.tasks import tokenize as tokenize_stage
from alignheads.tasks import train as train_stage
from alignheads.tasks import world as world_stage
from alignheads.tasks.cached import RunOutcome, run_stage
from alignheads.tasks.ingest import check_sources
from alignheads.tasks.prompts import save_prompt_set, sweep_prompt_sets


@flow(name="alignheads-pipeline", log_prints=True)
@user_errors_fail_in_one_line
def pipeline(config: RunConfig | None = None, overrides: list[str] | None = None) -> RunOutcome:
    """Run the alignheads pipeline on one run config; returns each stage's artifact and status.

    Args:
        config: The run config; empty runs the embedded default (configs/tiny.yaml, shipped with
            the package).
        overrides: `key.path=value` settings applied on top of `config`, as `alignheads run --set`
            does (values are YAML), e.g. ["store=/data/run1", "sweep.alphas=[0, 1, 2]"].
    """
    config = config if config is not None else read_config()
    cfg = (with_overrides(config, overrides) if overrides else config).resolved()
    with writing(cfg.store, cfg.store.parent):  # a read-only or full disk: one clear line
        cfg.store.mkdir(parents=True, exist_ok=True)
    with tracked(cfg, flatten(cfg), "pipeline") as run, library_progress_bars_off():
        outcome = run_pipeline(cfg, run)
        run.headline(outcome)
        run.finish(outcome)
    return logged(outcome.model_copy(update={"mlflow_run": run.run_id}), get_run_logger().info)


def run_pipeline(cfg: RunConfig, run: RunTracking) -> RunOutcome:
    """Every stage of `cfg`, in DAG order (inside a flow run)."""
    outcome, model_source = prepare_inputs(cfg, run)
    plans = train_methods(cfg.store, cfg.train, outcome.refpass.path, model_source, run, outcome)
    if plans:
        sweep_and_report(cfg, plans, outcome.data.path, model_source, run, outcome)
    return outcome


def prepare_inputs(cfg: RunConfig, run: RunTracking) -> tuple[RunOutcome, dict[str, Any]]:
    """The stages every method's training reads (world, data, tokenize, reference pass), cached;
    returns the outcome so far and the run's model source (what train, calibrate and generate
    load)."""
    check_sources(cfg)  # a missing data or prompts file fails now, not after the world is built
    store, outcome = cfg.store, RunOutcome()
    world_dir = None
    if cfg.needs_world:
        if not cfg.world.build:
            raise ValueError("model or data come from the tiny world, but world.build is false")
        key = world_stage.world_key(cfg.world)
        outcome.world = run_stage(world_stage.world_task, store, key=key, world=cfg.world)
        world_dir = outcome.world.directory

    model_path, revision = model_location(cfg.model, world_dir)
    tokenizer_source = {
        "name_or_path": model_path,
        "revision": revision,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    tok_fp = tokenizer_fingerprint(load_tokenizer(**tokenizer_source))

    world_key = outcome.world.key if outcome.world is not None else None
    dplan = data_stage.plan_data(cfg.data, world_dir, world_key, tok_fp)
    outcome.data = run_stage(
        data_stage.data_task, store, key=dplan.key, plan=asdict(dplan), tokenizer_source=tokenizer_source
    )
    run.pairs_dataset(cfg, outcome.data)
    rejected = sum(outcome.data.info.get("rejects", {}).values())
    if rejected:
        get_run_logger().warning("%d bad rows skipped and recorded in the rejects table", rejected)
    overlap = outcome.data.info.get("overlap", {})
    if overlap.get("test_pairs_with_train_prompt"):
        get_run_logger().warning(
            "%d held-out pairs repeat a training prompt word for word (%s; data.train_overlap: %s)",
            overlap["test_pairs_with_train_prompt"],
            f"{overlap['dropped']} dropped" if overlap["dropped"] else "kept",
            overlap["policy"],
        )

    tplan = tokenize_stage.plan_tokenize(cfg.tokenize, outcome.data.key, outcome.data.path, tok_fp)
    outcome.tokenize = run_stage(
        tokenize_stage.tokenize_task,
        store,
        key=tplan.key,
        plan=asdict(tplan),
        tokenizer_source=tokenizer_source,
    )
    rplan = refpass_stage.plan_refpass(cfg.refpass, cfg.model, model_path, outcome.tokenize.path, tok_fp)
    outcome.refpass = reference_pass(cfg, rplan)

    return outcome, tokenizer_source | {"dtype": cfg.model.dtype}


def train_methods(
    store: Path,
    train: TrainConfig,
    refpass_path: str | Path,
    model_source: dict[str, Any],
    run: RunTracking,
    outcome: RunOutcome,
) -> dict[str, train_stage.TrainPlan]:
    """Train every enabled method over the reference cache, each a cached stage in an MLflow
    child run; records each result in `outcome.train` and returns the plans by method name."""
    plans = {}
    for entry, settings in enabled_methods(train):
        plan = train_stage.plan_train(entry.name, settings, refpass_path, model_source)
        with run.child_training(plan) as child:
            result = run_stage(
                train_stage.train_task, store, key=plan.key, plan=asdict(plan), tracking=child.tracking
            )
            run.trained(child, plan, result)
        plans[entry.name], outcome.train[entry.name] = plan, result
    return plans


def sweep_and_report(
    cfg: RunConfig,
    plans: dict[str, train_stage.TrainPlan],
    data_path: str | Path | None,
    model_source: dict[str, Any],
    run: RunTracking,
    outcome: RunOutcome,
) -> None:
    """α calibration to the target KLs (one cached task per method, on calibration prompts),
    then α-sweep generation of every method at the sweep's α and its calibrated α (one cached
    task per method, all α batched, mapped over the runner), the evaluation and the report;
    records each result in `outcome`."""
    sweep: SweepConfig = cfg.sweep
    targets = cfg.evaluate.target_kls
    n_calibration = cfg.evaluate.calibration_prompts if targets else 0
    prompts, calibration_prompts, counts = sweep_prompt_sets(
        data_path, sweep, n_calibration, cfg.data.train_overlap
    )
    if counts["dropped_train_prompts"]:
        get_run_logger().warning(
            "%d sweep prompts left out: they are training prompts (data.train_overlap: drop)",
            counts["dropped_train_prompts"],
        )
    alphas = {name: list(sweep.alphas) for name in plans}
    prompts_path = save_prompt_set(cfg.store, prompts)
    if n_calibration:
        calibration_path = save_prompt_set(cfg.store, calibration_prompts)
        cplans = [
            calibrate_stage.plan_calibrate(
                outcome.train[name].path, calibration_path, sweep, cfg.evaluate, model_source
            )
            for name in plans
        ]
        for name, result in zip(plans, calibrations(cfg, cplans), strict=True):
            outcome.calibrate[name] = result
            extra = calibrate_stage.calibrated_alphas(result).values()
            alphas[name] += sorted(set(extra) - set(alphas[name]))
    gen_plans = [
        generate_stage.plan_generate(outcome.train[name].path, alpha, prompts_path, sweep, model_source)
        for name in plans
        for alpha in alphas[name]
    ]
    outcome.generate = generations(cfg, gen_plans)
    eplan = evaluate_stage.plan_evaluate(
        [g.path for g in outcome.generate],
        cfg.evaluate.reward,
        run_id=run.run_id or "",
        trained={name: (asdict(plan), outcome.train[name].path) for name, plan in plans.items()},
        calibration={name: result.info["targets"] for name, result in outcome.calibrate.items()},
        statistics=evaluate_stage.statistics_settings(cfg.evaluate, sweep.seed),
        reward_revision=cfg.evaluate.reward_revision,
        reward_batch_size=cfg.evaluate.batch_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    outcome.evaluate = run_stage(evaluate_stage.evaluate_task, cfg.store, key=eplan.key, plan=asdict(eplan))
    rplan = report_stage.plan_report(outcome.evaluate.path, [g.path for g in outcome.generate])
    outcome.report = run_stage(report_stage.report_task, cfg.store, key=rplan.key, plan=asdict(rplan))
    run.report(cfg, outcome)
